#!/usr/bin/env python3
"""Instructions beatlib adds to the request thread of a Flask /items request, by callgrind.

    PYTHONPATH=src python benchmarks/request_instructions.py [--runs 3] [--requests 200]
    PYTHONPATH=src python benchmarks/request_instructions.py --profile   # beatlib's calls
    PYTHONPATH=src python benchmarks/request_instructions.py --child beatlib   # one variant

The default runs each variant (`plain`: the peers' app alone, `beatlib`: the same app as
peers/run_one.py sets it up) `--runs` times, each in its own process under
`valgrind --tool=callgrind --collect-atstart=no --toggle-collect=sys_call_tracing`, one
valgrind at a time, and prints the instructions per request of each run, their median, and
beatlib's median minus plain's. Only the measured loops are counted: `--chunks` times
`--requests` GET /items through Flask's test client, each chunk inside
`sys.call_tracing`. beatlib sends to a local sink (peers/sink.py) as in production, with
default settings except `flush_interval` (an hour): its worker thread wakes once 16
transactions wait and encodes them (callgrind counts each thread's instructions apart, and
only the request thread runs inside `sys.call_tracing`), and a flush between chunks (not
counted) sends them. `--asleep` keeps the worker asleep through each chunk instead (its
wake-up threshold raised), so the transactions of a chunk all wait: as beatlib did before
it woke the worker at 16, with more work for the collector. Instruction counts repeat where timings on a shared machine do not; run with
PYTHONHASHSEED=0 (set for the children) and under `setarch -R` (used when present).

`--profile` (no valgrind) counts, per request, the bytecodes run in each of beatlib's own
functions (sys.settrace opcode events), their calls, and the time cProfile gives them
(inflated by the profiler; for the ranking only).
"""

from __future__ import annotations

import argparse
import gc
import glob
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS = os.path.join(HERE, "peers")


def build(variant: str, sink_url: str):
    """(the app's test client, the beatlib client or None)."""
    sys.path.insert(0, PEERS)
    import app as appmod

    if variant == "plain":
        return appmod.create_app(sink_url).test_client(), None
    import beatlib
    from beatlib.contrib.flask import Beat

    client = beatlib.Client(service_name="peerbench", server_url=sink_url,
                            environment="bench", flush_interval="3600s")
    app = appmod.create_app(sink_url)
    Beat(app, client=client)
    return app.test_client(), client


def start_sink():
    p = subprocess.Popen([sys.executable, os.path.join(PEERS, "sink.py"), "0"],
                         stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline().strip()
    if not line.startswith("SINK_PORT "):
        p.kill()
        raise RuntimeError("sink did not start: %r" % line)
    return p, "http://127.0.0.1:%s" % line.split()[1]


def child(args: argparse.Namespace) -> None:
    sink, sink_url = start_sink()
    try:
        test_client, client = build(args.child, sink_url)

        def requests(n: int) -> None:
            get = test_client.get
            for _ in range(n):
                response = get("/items")
                response.close()  # what a WSGI server does; the transaction ends here
                if response.status_code != 200:
                    raise SystemExit("GET /items: %s" % response.status)

        def settle() -> None:
            if client is not None and not client.flush(60):
                raise SystemExit("beatlib: the flush did not send everything")
            gc.collect()

        requests(args.warmup)
        settle()
        if args.gc_off:
            gc.disable()
        if client is not None:
            worker = client.transport.worker
            assert worker is not None and worker.is_alive()
            if args.asleep:
                client.transport._wake_at = args.requests + 1
        for _ in range(args.chunks):
            sys.call_tracing(requests, (args.requests,))
            if client is not None and args.asleep:
                # The worker did not run during the loop: everything waiting.
                assert client.transport.backlog == args.requests, client.transport.backlog
            settle()
        if client is not None:
            client.close(60)
    finally:
        sink.kill()
        sink.wait()


def profile(args: argparse.Namespace) -> None:
    import cProfile
    import pstats

    sink, sink_url = start_sink()
    try:
        test_client, client = build("beatlib", sink_url)
        for _ in range(args.warmup):
            test_client.get("/items").close()
        client.flush(60)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.requests):
            test_client.get("/items").close()
        profiler.disable()
        client.flush(60)
        src = os.path.dirname(sys.modules["beatlib"].__file__)
        opcodes = count_opcodes(test_client, client, src, args.requests)
        client.close(60)
    finally:
        sink.kill()
        sink.wait()
    stats = pstats.Stats(profiler)
    rows = []
    for (path, line, name), (_cc, calls, tt, _ct, _callers) in stats.stats.items():
        if path.startswith(src):
            where = "%s:%d %s" % (os.path.relpath(path, src), line, name)
            rows.append((opcodes.pop(where, 0) / args.requests, calls / args.requests,
                         tt / args.requests * 1e6, where))
    rows.extend((n / args.requests, 0, 0, where) for where, n in opcodes.items())
    rows.sort(key=lambda r: -r[0])
    print("%9s %8s %10s  %s" % ("opcodes/rq", "calls/rq", "own µs/rq", "beatlib function"))
    for ops, calls, own, where in rows:
        print("%9.1f %8.1f %10.1f  %s" % (ops, calls, own, where))
    print("%9.1f %8.1f %10.1f  total" % tuple(sum(r[i] for r in rows) for i in range(3)))


def count_opcodes(test_client, client, src: str, n: int) -> dict[str, int]:
    """Bytecodes run in each of beatlib's functions (generator resumptions included) over
    `n` requests: sys.settrace with opcode events, in beatlib's frames only."""
    counts: dict[str, int] = {}

    def local(frame, event, arg):
        if event == "opcode":
            code = frame.f_code
            where = "%s:%d %s" % (os.path.relpath(code.co_filename, src),
                                  code.co_firstlineno, code.co_name)
            counts[where] = counts.get(where, 0) + 1
        return local

    def global_(frame, event, arg):
        if not frame.f_code.co_filename.startswith(src):
            return None
        frame.f_trace_opcodes = True
        return local

    sys.settrace(global_)
    try:
        for _ in range(n):
            test_client.get("/items").close()
    finally:
        sys.settrace(None)
    client.flush(60)
    return counts


def callgrind(variant: str, args: argparse.Namespace, out_dir: str) -> float:
    out = os.path.join(out_dir, "callgrind.%s.%%p" % variant)
    cmd = ["valgrind", "--tool=callgrind", "--collect-atstart=no",
           "--toggle-collect=sys_call_tracing", "--callgrind-out-file=" + out,
           sys.executable, os.path.abspath(__file__), "--child", variant,
           "--requests", str(args.requests), "--chunks", str(args.chunks),
           "--warmup", str(args.warmup), *(["--gc-off"] if args.gc_off else []),
           *(["--asleep"] if args.asleep else [])]
    if shutil.which("setarch"):
        cmd = ["setarch", os.uname().machine, "-R", *cmd]
    env = dict(os.environ, PYTHONHASHSEED="0")
    before = set(glob.glob(os.path.join(out_dir, "callgrind.%s.*" % variant)))
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL if not args.verbose else None)
    files = set(glob.glob(os.path.join(out_dir, "callgrind.%s.*" % variant))) - before
    total = 0
    for path in files:  # the Python process's only (the sink's is not traced: no children)
        with open(path) as f:
            for line in f:
                m = re.match(r"(?:summary|totals): (\d+)", line)
                if m:
                    total = max(total, int(m.group(1)))
                    break
    return total / (args.requests * args.chunks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each variant")
    parser.add_argument("--requests", type=int, default=200, help="requests per chunk")
    parser.add_argument("--asleep", action="store_true",
                        help="the worker asleep through each chunk (see above)")
    parser.add_argument("--chunks", type=int, default=1, help="measured chunks per run")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--variants", default="plain,beatlib")
    parser.add_argument("--gc-off", action="store_true",
                        help="the cyclic collector off in the measured loops (what it costs)")
    parser.add_argument("--out-dir", help="keep the callgrind files here")
    parser.add_argument("--child", choices=("plain", "beatlib"), help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help="cProfile beatlib's functions")
    parser.add_argument("--verbose", action="store_true", help="valgrind's output on stderr")
    args = parser.parse_args()
    if args.requests >= 256:
        parser.error("--requests must stay below 256 (the queue length that wakes the worker)")
    if args.child:
        return child(args)
    if args.profile:
        return profile(args)
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="request-instructions-")
    os.makedirs(out_dir, exist_ok=True)
    medians = {}
    for variant in args.variants.split(","):
        counts = [callgrind(variant, args, out_dir) for _ in range(args.runs)]
        medians[variant] = statistics.median(counts)
        print("%-8s %s  median %.0f  spread %.0f" % (
            variant, " ".join("%.0f" % c for c in counts), medians[variant],
            max(counts) - min(counts)), flush=True)
    if "plain" in medians and "beatlib" in medians:
        print("beatlib - plain: %.0f instructions per request"
              % (medians["beatlib"] - medians["plain"]))
    if not args.out_dir:
        shutil.rmtree(out_dir)


if __name__ == "__main__":
    main()
