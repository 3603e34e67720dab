"""Django under ASGI, plain and with beatlib: N concurrent requests through Django's
`AsyncClient` to an async view that awaits (I/O-bound, 0.2 s), and the cost per request of an
async view that returns at once (CPU-bound), each mode in its own interpreter.

    python benchmarks/django_async.py [--concurrency 10 50] [--rounds 5] [--fast 500] [--runs 3]
                                      [--no-middleware]

Django's default middleware (security, sessions, common, auth) is installed unless
--no-middleware: each of those is run through sync_to_async, a thread hop each, which makes
most of a fast request's time. beatlib ships to a local sink (a process of its own) answering
202: the worker's encoding, gzip and HTTP run as in production.

The two modes' interpreters take turns (--runs each); each figure is the best of all rounds;
the ratio is beatlib / plain. The fast case's wall time is at the mercy of other processes on
the machine; its CPU times (the event loop's thread; the whole process: Django's sync thread,
beatlib's worker included) much less so. Last, the fast case once more in one interpreter,
with and without beatlib's middleware in alternate rounds: the median ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import statistics
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

WAIT = 0.2  # seconds the I/O-bound view awaits


class Sink(BaseHTTPRequestHandler):
    """An APM server that accepts every batch."""

    def do_POST(self) -> None:  # noqa: N802 - the http.server naming
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(202)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


async def waiting(request: Any) -> Any:
    from django.http import HttpResponse

    await asyncio.sleep(WAIT)
    return HttpResponse("waited")


async def fast(request: Any) -> Any:
    from django.http import HttpResponse

    return HttpResponse("fast")


DEFAULT_MIDDLEWARE = ["django.middleware.security.SecurityMiddleware",
                      "django.contrib.sessions.middleware.SessionMiddleware",
                      "django.middleware.common.CommonMiddleware",
                      "django.contrib.auth.middleware.AuthenticationMiddleware"]


def setup(mode: str, middleware: list[str]) -> None:
    import django
    from django.conf import settings
    from django.urls import path

    apps = ["django.contrib.auth", "django.contrib.contenttypes", "django.contrib.sessions"]
    beat: dict[str, Any] = {}
    if mode in ("beatlib", "paired"):
        # In a process of its own, so the process CPU measured here is beatlib's and Django's.
        sink = subprocess.Popen([sys.executable, __file__, "--sink"], stdout=subprocess.PIPE,
                                text=True)
        atexit.register(sink.terminate)
        port = int(sink.stdout.readline()) if sink.stdout else 0
        apps.append("beatlib.contrib.django")
        beat = {"SERVICE_NAME": "bench", "SERVER_URL": f"http://127.0.0.1:{port}",
                "FLUSH_INTERVAL": "1s"}
    settings.configure(
        DEBUG=False, SECRET_KEY="bench", ALLOWED_HOSTS=["*"], ROOT_URLCONF=__name__,
        INSTALLED_APPS=apps, BEATLIB=beat,
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
        MIDDLEWARE=middleware,
    )
    globals()["urlpatterns"] = [path("wait/", waiting), path("fast/", fast)]
    django.setup()


async def concurrent(client: Any, url: str, n: int) -> tuple[float, float, float]:
    """Seconds of wall time, of the loop thread's CPU and of the process's CPU."""
    started = time.perf_counter(), time.thread_time(), time.process_time()
    responses = await asyncio.gather(*(client.get(url) for _ in range(n)))
    ended = time.perf_counter(), time.thread_time(), time.process_time()
    assert all(r.status_code == 200 for r in responses)
    return ended[0] - started[0], ended[1] - started[1], ended[2] - started[2]


async def measure(concurrency: list[int], rounds: int, fast_requests: int) -> dict[str, Any]:
    from django.test import AsyncClient

    client = AsyncClient()
    await concurrent(client, "/fast/", 20)  # middleware loaded, code paths warm
    figures: dict[str, Any] = {}
    for n in concurrency:
        figures[f"wait x{n} (s)"] = min([(await concurrent(client, "/wait/", n))[0]
                                         for _ in range(rounds)])
    fast = [await concurrent(client, "/fast/", fast_requests) for _ in range(rounds)]
    for i, what in enumerate(("wall", "loop thread CPU", "process CPU")):
        figures[f"fast, {what} (us/req)"] = min(f[i] for f in fast) / fast_requests * 1e6
    return figures


async def paired(rounds: int, fast_requests: int) -> dict[str, Any]:
    """One interpreter, beatlib installed, two handlers: without and with its middleware, in
    alternate rounds, so a change in the machine's load hits both alike. The median of the
    rounds' ratios."""
    from django.conf import settings
    from django.test import AsyncClient, override_settings

    plain, beat = AsyncClient(), AsyncClient()
    with override_settings(MIDDLEWARE=[m for m in settings.MIDDLEWARE if "beatlib" not in m]):
        await concurrent(plain, "/fast/", 20)  # its middleware chain is built now
    await concurrent(beat, "/fast/", 20)
    ratios: list[list[float]] = [[], [], []]
    for n in range(rounds):  # ABBA: neither goes first every time
        if n % 2:
            with_ = await concurrent(beat, "/fast/", fast_requests)
            without = await concurrent(plain, "/fast/", fast_requests)
        else:
            without = await concurrent(plain, "/fast/", fast_requests)
            with_ = await concurrent(beat, "/fast/", fast_requests)
        for i in range(3):
            ratios[i].append(with_[i] / without[i])
    return {f"paired fast, {what} (ratio)": statistics.median(ratios[i])
            for i, what in enumerate(("wall", "loop thread CPU", "process CPU"))}


def child(args: argparse.Namespace) -> None:
    setup(args.mode, [] if args.no_middleware else DEFAULT_MIDDLEWARE)
    if args.mode == "paired":
        print(json.dumps(asyncio.run(paired(args.rounds * 2, args.fast))))
        return
    figures = asyncio.run(measure(args.concurrency, args.rounds, args.fast))
    if args.mode == "beatlib":
        from beatlib import get_client

        client = get_client()
        assert client is not None and client.flush(10)
        figures["events sent"] = client.stats().get("sent_events", -1)
    print(json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--fast", type=int, default=500, help="requests in the CPU-bound case")
    parser.add_argument("--no-middleware", action="store_true",
                        help="no Django middleware but beatlib's")
    parser.add_argument("--runs", type=int, default=3, help="interpreters per mode, in turn")
    parser.add_argument("--mode", choices=["plain", "beatlib", "paired"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--sink", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sink:
        sink = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
        print(sink.server_port, flush=True)
        sink.serve_forever()
    if args.mode:
        child(args)
        return
    results: dict[str, dict[str, float]] = {"plain": {}, "beatlib": {}}
    for _ in range(args.runs):
        for mode in ("plain", "beatlib"):
            out = subprocess.run(
                [sys.executable, __file__, "--mode", mode, "--rounds", str(args.rounds),
                 "--fast", str(args.fast), "--concurrency", *map(str, args.concurrency),
                 *(["--no-middleware"] if args.no_middleware else [])],
                check=True, capture_output=True, text=True).stdout
            for key, value in json.loads(out.strip().splitlines()[-1]).items():
                best = results[mode].get(key)
                results[mode][key] = value if best is None else min(best, value)
    print(f"{'':32} {'plain':>10} {'beatlib':>10} {'ratio':>7}")
    sent = results["beatlib"].pop("events sent")
    for key, plain in results["plain"].items():
        beat = results["beatlib"][key]
        print(f"{key:32} {plain:10.4f} {beat:10.4f} {beat / plain:7.2f}")
    print(f"events sent by beatlib (fewest of a run): {sent:.0f}")
    out = subprocess.run(
        [sys.executable, __file__, "--mode", "paired", "--rounds", str(args.rounds),
         "--fast", str(args.fast), *(["--no-middleware"] if args.no_middleware else [])],
        check=True, capture_output=True, text=True).stdout
    for key, ratio in json.loads(out.strip().splitlines()[-1]).items():
        print(f"{key:54} {ratio:7.2f}")


if __name__ == "__main__":
    main()
