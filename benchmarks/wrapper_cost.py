"""What instrumentation costs per call: unwrapped, wrapped outside a transaction, and wrapped
inside a sampled transaction (one span each), as ratios measured in one run.

    python benchmarks/wrapper_cost.py [--calls 20000] [--repeat 7] [--only NAME]

Spans are built as in production but not shipped (enabled=False stops only the sending), so
the figures are the request thread's cost. Each figure is the best of --repeat runs. A case
whose library or server (Debian's redis-server, memcached and rabbitmq-server, started here
on 127.0.0.1) is missing is left out. Calls that cross a socket (redis, memcached, pika,
http.client, grpc) time the round trip too: read their added µs, not their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import http.client
import http.server
import importlib.util
import shutil
import sqlite3
import sys
import tempfile
import threading
import timeit
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent import futures
from pathlib import Path

import jinja2
import sqlalchemy

import beatlib

BATCH = 100  # calls per transaction in the "inside" case
_servers = contextlib.ExitStack()  # servers the cases started, stopped at exit
atexit.register(_servers.close)


def best_per_call(func: Callable[[], object], calls: int, repeat: int) -> float:
    runs = timeit.repeat(func, number=calls, repeat=repeat)
    return min(runs) / calls * 1e6


def inside(client: beatlib.Client, func: Callable[[], object]) -> Callable[[], None]:
    """`func` inside transactions of BATCH calls; the begin/end cost is spread over them."""
    state = {"n": 0}

    def call() -> None:
        if state["n"] == 0:
            client.begin_transaction("bench")
        func()
        state["n"] += 1
        if state["n"] == BATCH:
            client.end_transaction("bench")
            state["n"] = 0

    return call


def cases() -> dict[str, Callable[[], Callable[[], object]]]:
    """Name -> a factory run after (un)instrumenting, returning the call to time."""

    def sqlite_execute() -> Callable[[], object]:
        cursor = sqlite3.connect(":memory:").cursor()
        return lambda: cursor.execute("SELECT 1")

    def sqlalchemy_execute() -> Callable[[], object]:
        engine = sqlalchemy.create_engine("sqlite://")
        conn = engine.connect()
        query = sqlalchemy.text("SELECT 1")
        return lambda: conn.execute(query)

    def jinja2_render() -> Callable[[], object]:
        template = jinja2.Environment().from_string("<p>{{ name }}</p>")
        return lambda: template.render(name="x")

    def kombu_publish() -> Callable[[], object]:
        # The in-memory transport, to a fanout exchange nothing is bound to: no broker, and
        # nothing piles up; what is timed is kombu's own work and ours.
        import kombu  # not in the peers' lock file: the case is listed only when installed

        producer = kombu.Connection("memory://").Producer(
            exchange=kombu.Exchange("bench", "fanout"))
        return lambda: producer.publish({"n": 1}, routing_key="bench")

    def grpc_unary_call() -> Callable[[], object]:
        # Both sides in this process: the client span and the served call's transaction.
        import grpc  # not in the peers' lock file: the case is listed only when installed

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("b.Echo", {
            "Unary": grpc.unary_unary_rpc_method_handler(lambda request, context: request)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        atexit.register(server.stop, None)
        stub = grpc.insecure_channel(f"127.0.0.1:{port}").unary_unary("/b.Echo/Unary")
        return lambda: stub(b"x", timeout=10)

    def redis_get() -> Callable[[], object]:
        import redis

        server = _servers.enter_context(_cache_server("redis"))
        client = redis.Redis(host=server.host, port=server.port)
        client.set("user:1", "x")
        return lambda: client.get("user:1")

    def pymemcache_get() -> Callable[[], object]:
        from pymemcache.client.base import Client

        server = _servers.enter_context(_cache_server("memcached"))
        client = Client((server.host, server.port))
        client.set("user:1", b"x")
        return lambda: client.get("user:1")

    def botocore_call() -> Callable[[], object]:
        # botocore's whole call (parameters, signing, parsing) with the HTTP send answered by
        # its own `before-send` event: no server, no network.
        import botocore.awsrequest
        import botocore.session

        s3 = botocore.session.get_session().create_client(
            "s3", region_name="eu-west-1", aws_access_key_id="k", aws_secret_access_key="s")

        class Body:  # what AWSResponse reads an empty body from
            def stream(self, **kwargs: object) -> Iterator[bytes]:
                return iter(())

        s3.meta.events.register("before-send", lambda request, **kw: botocore.awsrequest
                                .AWSResponse(request.url, 200, {}, Body()))
        return lambda: s3.head_object(Bucket="my-bucket", Key="k")

    def pika_publish() -> Callable[[], object]:
        # To a fanout exchange nothing is bound to: the broker drops each message.
        import pika

        broker = _servers.enter_context(_broker())
        connection = pika.BlockingConnection(pika.ConnectionParameters(
            broker.host, broker.port, credentials=pika.PlainCredentials(broker.user,
                                                                        broker.password)))
        _servers.callback(connection.close)
        channel = connection.channel()
        channel.exchange_declare("bench", "fanout")
        return lambda: channel.basic_publish("bench", "bench", b"x")

    def http_client_get() -> Callable[[], object]:
        server = _servers.enter_context(_http_server())
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)

        def get() -> bytes:
            conn.request("GET", "/")
            return conn.getresponse().read()
        return get

    def grpc_aio_stream_call() -> Callable[[], object]:
        # A grpc.aio server and channel on a loop of their own, run for each call: a
        # unary-stream call of three messages, read to its end (async generator handler).
        import grpc

        async def numbers(request: bytes, context: object) -> AsyncIterator[bytes]:
            for _ in range(3):
                yield request

        async def start() -> tuple[object, Callable[[], Awaitable[object]]]:
            server = grpc.aio.server()
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("b.Echo", {
                "Numbers": grpc.unary_stream_rpc_method_handler(numbers)}),))
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            stub = grpc.aio.insecure_channel(f"127.0.0.1:{port}").unary_stream("/b.Echo/Numbers")

            async def call() -> object:
                return [m async for m in stub(b"x", timeout=10)]

            return server, call  # the server is stopped when collected: it is kept with the call

        loop = asyncio.new_event_loop()
        server_and_call = loop.run_until_complete(start())
        return lambda: loop.run_until_complete(server_and_call[1]())

    found = {
        "sqlite3 cursor.execute": sqlite_execute,
        "SQLAlchemy conn.execute": sqlalchemy_execute,
        "Jinja2 Template.render": jinja2_render,
        "http.client GET": http_client_get,
    }
    for needs, name, case in (("kombu", "kombu Producer.publish", kombu_publish),
                              ("grpc", "grpc unary call", grpc_unary_call),
                              ("grpc", "grpc.aio stream call", grpc_aio_stream_call),
                              ("redis redis-server", "redis GET", redis_get),
                              ("pymemcache memcached", "pymemcache get", pymemcache_get),
                              ("botocore", "botocore S3 HeadObject", botocore_call),
                              ("pika rabbitmq-server", "pika basic_publish", pika_publish)):
        module, *binary = needs.split()
        if importlib.util.find_spec(module) is not None and all(map(shutil.which, binary)):
            found[name] = case
    return found


def _tests_path() -> None:
    """The tests' server starters (tests/cache_servers.py, tests/brokers.py) importable."""
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)


def _broker() -> contextlib.AbstractContextManager:
    _tests_path()
    from tests.brokers import running_rabbitmq

    return running_rabbitmq(Path(_servers.enter_context(tempfile.TemporaryDirectory())))


def _cache_server(kind: str) -> contextlib.AbstractContextManager:
    _tests_path()
    from tests.cache_servers import running_memcached, running_redis

    if kind == "redis":
        home = Path(_servers.enter_context(tempfile.TemporaryDirectory()))
        return running_redis(str(shutil.which("redis-server")), home)
    return running_memcached(str(shutil.which("memcached")))


@contextlib.contextmanager
def _http_server() -> Iterator[http.server.HTTPServer]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: a request per call, not a connection
        disable_nagle_algorithm = True  # else the body waits for the headers' delayed ACK

        def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--only", action="append", metavar="NAME",
                        help="cases whose name contains NAME (repeatable)")
    args = parser.parse_args()
    client = beatlib.Client(service_name="bench", enabled=False, transaction_max_spans=1000)
    print(f"{'call':<26}{'plain µs':>10}{'outside µs':>12}{'ratio':>7}{'span µs':>10}"
          f"{'ratio':>7}")
    for name, make in cases().items():
        if args.only and not any(part.lower() in name.lower() for part in args.only):
            continue
        beatlib.uninstrument()
        plain = best_per_call(make(), args.calls, args.repeat)
        beatlib.instrument(client.config)
        func = make()
        outside = best_per_call(func, args.calls, args.repeat)
        with_span = best_per_call(inside(client, func), args.calls, args.repeat)
        print(f"{name:<26}{plain:>10.2f}{outside:>12.2f}{outside / plain:>7.2f}"
              f"{with_span:>10.2f}{with_span / plain:>7.2f}")
    beatlib.uninstrument()


if __name__ == "__main__":
    main()
