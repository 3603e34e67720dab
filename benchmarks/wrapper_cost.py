"""What instrumentation costs per call: unwrapped, wrapped outside a transaction, and wrapped
inside a sampled transaction (one span each), as ratios measured in one run.

    python benchmarks/wrapper_cost.py [--calls 20000] [--repeat 7]

Spans are built as in production but not shipped (enabled=False stops only the sending), so
the figures are the request thread's cost. Each figure is the best of --repeat runs.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import importlib.util
import sqlite3
import timeit
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent import futures

import jinja2
import sqlalchemy

import beatlib

BATCH = 100  # calls per transaction in the "inside" case


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
    }
    for module, name, case in (("kombu", "kombu Producer.publish", kombu_publish),
                               ("grpc", "grpc unary call", grpc_unary_call),
                               ("grpc", "grpc.aio stream call", grpc_aio_stream_call)):
        if importlib.util.find_spec(module) is not None:
            found[name] = case
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    client = beatlib.Client(service_name="bench", enabled=False, transaction_max_spans=1000)
    print(f"{'call':<26}{'plain µs':>10}{'outside µs':>12}{'ratio':>7}{'span µs':>10}"
          f"{'ratio':>7}")
    for name, make in cases().items():
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
