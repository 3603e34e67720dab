#!/usr/bin/env python3
"""Measure one APM agent's per-request overhead on the FastAPI twin under uvicorn.

    python run_one_asgi.py AGENT N [--warmup 300] [--errors 500] [--outbound 200]
    python run_one_asgi.py AGENT 0 --paired    # driven by paired.py --app fastapi

As run_one.py, but the app runs in its own process (asgi_server.py: uvicorn, one worker) and
this one drives it over one keep-alive HTTP connection on loopback, a request at a time: the
latency is the client's, the CPU and the RSS are the server process's (all its threads, the
agent's included). Prints one JSON line of run_one.py's shape, so summarize.py reads both.
--paired as run_one.py's: the app's CPU is that of the server's event loop and thread pool,
the background CPU that of its other threads (the agent's) and of its helper processes.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from run_one import AGENTS, log, paired, pct, rss_kb, sink_call, start_sink, summary

HERE = os.path.dirname(os.path.abspath(__file__))
TICK = os.sysconf("SC_CLK_TCK")


def cpu_ns(pid: int) -> int:
    """User + system CPU of the process so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // TICK


class Connection(http.client.HTTPConnection):
    """Without Nagle's algorithm, as a load generator or a proxy would (else a delayed ACK
    adds 40 ms to a request now and then)."""

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def tasks(pid: int) -> dict[int, int]:
    """CPU (ns, the scheduler's count) of each thread of process `pid`; {} once it is gone."""
    found = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                found[int(tid)] = int(f.read().split()[0])
        except OSError:
            pass  # ended since the listing
    return found


def children(pid: int) -> list[int]:
    """The processes `pid` started (every thread's), not their own children."""
    found = []
    for tid in tasks(pid):
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return found


APP_THREADS = ("MainThread", "AnyIO worker thread", "asyncio_")  # uvicorn's loop, the pool's


class ServerCPU:
    """`cpu()` for `paired`: the server's app threads' CPU and everything else's (its other
    threads and its helper processes) so far, in ns. Threads come and go (the thread pool's
    end after 10 s idle): each reading adds what each thread ran since the last one."""

    def __init__(self, server: subprocess.Popen) -> None:
        self.server = server
        self.names: dict[int, str] = {}
        self.asked: set[int] = set()
        self.last: dict[int, int] = {}
        self.app_ns = self.bg_ns = 0

    def ask_names(self) -> None:
        self.server.send_signal(signal.SIGUSR1)
        while True:
            line = self.server.stdout.readline()
            if not line:
                raise RuntimeError("server exited")
            if line.startswith("THREADS "):
                self.names = {int(k): v for k, v in json.loads(line[8:]).items()}
                return

    def __call__(self) -> tuple[int, int]:
        pid = self.server.pid
        own = tasks(pid)
        if not own.keys() <= self.names.keys() | self.asked:
            self.ask_names()
            self.asked |= own.keys()
        now = dict(own)
        helpers = set()
        for child in children(pid):
            found = tasks(child)
            helpers |= found.keys()
            now.update(found)
        for tid, ns in now.items():
            ran = ns - self.last.get(tid, 0)
            if tid not in helpers and self.names.get(tid, "").startswith(APP_THREADS):
                self.app_ns += ran
            else:
                self.bg_ns += ran
        self.last = now
        return self.app_ns, self.bg_ns


def helpers_rss_kb(pid: int) -> int | None:
    rss = [rss_kb(child)[0] or 0 for child in children(pid)]
    return sum(rss) if rss else None


def timed(conn: http.client.HTTPConnection, pid: int, path: str, n: int, expect: int) -> dict:
    pc = time.perf_counter_ns
    durs = [0] * n
    bad = 0
    cpu0 = cpu_ns(pid)
    t0 = pc()
    # uvicorn closes the connection after an app raised (/error): those requests each come
    # on a connection of their own, for every agent alike.
    headers = {"Connection": "close"} if expect == 500 else {}
    for i in range(n):
        s = pc()
        conn.request("GET", path, headers=headers)
        r = conn.getresponse()
        r.read()
        durs[i] = pc() - s
        if headers:
            conn.close()
        if r.status != expect:
            bad += 1
    wall = pc() - t0
    cpu = cpu_ns(pid) - cpu0
    durs.sort()
    us = lambda ns: round(ns / 1000.0, 1)  # noqa: E731
    return {"n": n, "median_us": us(statistics.median(durs)),
            "p10_us": us(pct(durs, 0.10)), "p25_us": us(pct(durs, 0.25)), "p90_us": us(pct(durs, 0.90)),
            "p99_us": us(pct(durs, 0.99)), "mean_us": us(sum(durs) / n), "min_us": us(durs[0]),
            "max_us": us(durs[-1]), "cpu_us_per_req": us(cpu / n),
            "wall_us_per_req": us(wall / n), "bad_status": bad}


def get_items(conn: http.client.HTTPConnection):
    """One GET /items on the keep-alive connection, as `paired` calls it."""

    def request() -> bool:
        conn.request("GET", "/items")
        r = conn.getresponse()
        r.read()
        return r.status == 200

    return request


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("agent", choices=AGENTS)
    ap.add_argument("n", type=int)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--errors", type=int, default=500)
    ap.add_argument("--outbound", type=int, default=200)
    ap.add_argument("--round", type=int, default=0, help="label only")
    ap.add_argument("--slot", default="", help="label only (run_all.sh: a/b for the two none runs)")
    ap.add_argument("--paired", action="store_true",
                    help="/items in slices on command from paired.py (N ignored; no /error or "
                         "/outbound timing)")
    args = ap.parse_args()
    if args.paired:
        args.errors = args.outbound = 0

    t_start = time.time()
    load0 = os.getloadavg()
    db_dir = tempfile.mkdtemp(prefix="peerbench-db-")
    sink, port = start_sink()
    server = subprocess.Popen([sys.executable, os.path.join(HERE, "asgi_server.py"), args.agent,
                               str(port)], stdout=subprocess.PIPE, stderr=sys.stderr, text=True,
                              env=dict(os.environ, PEERBENCH_DB_DIR=db_dir))
    try:
        ready = server.stdout.readline().split(" ", 2)
        if ready[0] != "READY":
            raise RuntimeError("server did not start: %r" % ready)
        info = json.loads(ready[2])
        conn = Connection("127.0.0.1", int(ready[1]), timeout=60)
        conn.request("GET", "/items")
        r = conn.getresponse()
        body = r.read()
        assert r.status == 200 and b"Item Number" in body, (r.status, body[:300])
        for path, n, expect in (("/items", args.warmup, 200), ("/error", 50, 500),
                                ("/outbound", 20, 200)):
            timed(conn, server.pid, path, n, expect)
        rss_warm, _ = rss_kb(server.pid)
        if args.paired:
            durs, totals = paired(get_items(conn), ServerCPU(server))
            items = summary(durs, totals)
            args.n = len(durs)
        else:
            items = timed(conn, server.pid, "/items", args.n, 200)
        rss_items, hwm_items = rss_kb(server.pid)
        helpers_rss = helpers_rss_kb(server.pid)
        errors = timed(conn, server.pid, "/error", args.errors, 500) if args.errors else None
        outbound = (timed(conn, server.pid, "/outbound", args.outbound, 200)
                    if args.outbound else None)
        conn.close()
        server.send_signal(signal.SIGTERM)
        flushed = []
        for line in server.stdout:  # after any THREADS line a signal asked for
            if line.startswith("FLUSHED"):
                flushed = line.split()
                break
        log("server said", flushed)
        server.wait(180)
        flush_s = float(flushed[1]) if flushed[:1] == ["FLUSHED"] else None
        time.sleep(0.5)  # let the sink finish answering anything in flight
        stats = sink_call(port, "GET", "/__stats")
    finally:
        if server.poll() is None:
            server.kill()
        sink.terminate()
        try:
            sink.wait(5)
        except subprocess.TimeoutExpired:
            sink.kill()
        shutil.rmtree(db_dir, ignore_errors=True)

    expected_txn = 1 + args.warmup + args.n + 50 + args.errors + 20 + args.outbound
    app_traffic = stats["by_path"].get("/outbound-target", {"requests": 0, "bytes": 0})
    out = {
        "agent": args.agent, "round": args.round, "slot": args.slot, "app": "fastapi", "version": info["version"],
        "python": platform.python_version(), "n": args.n,
        "items": items, "error": errors, "outbound": outbound,
        "memory": {"rss_warm_kb": rss_warm, "rss_items_kb": rss_items, "hwm_items_kb": hwm_items,
                   "child_rss_items_kb": helpers_rss},
        "flush_s": flush_s, "expected_transactions": expected_txn,
        "sink_requests": stats["requests"] - app_traffic["requests"],
        "sink_bytes": stats["bytes"] - app_traffic["bytes"],
        "sink": stats, "notes": info["notes"],
        "loadavg_start": [round(x, 2) for x in load0],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "elapsed_s": round(time.time() - t_start, 1),
    }
    log(args.agent, "items median", items["median_us"], "us")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
