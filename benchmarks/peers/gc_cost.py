#!/usr/bin/env python3
"""What an agent costs the app in garbage collection: each agent in a process of its own,
the Flask (or Django) app of run_one.py, N x /items through the test client after the
warm-up, the collector's runs counted and timed on the request thread (`gc.callbacks`).

    python gc_cost.py [AGENT ...] [--app flask|django] [--n 3000] [--reps 2]
    python gc_cost.py --child AGENT ...       # (internal) one agent in this process

Per agent: collections per 1,000 requests of each generation and their CPU per request,
the objects the collector tracks after the run, and what the middle generation holds when it
is collected (by type, per collection; what of it is still alive moves to the oldest).

Why: an agent's records wait for its background thread; every tracked object still alive
when the collector runs is moved to an older generation, and the objects reaching the oldest
count towards the next full collection, which walks every tracked object of the process
(tens of milliseconds in this app), on whichever thread allocates then: most often the app's.
"""
from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))


def child(agent: str, app_name: str, n: int) -> dict:
    warnings.simplefilter("ignore")
    sys.path.insert(0, HERE)
    db_dir = tempfile.mkdtemp(prefix="peerbench-db-")
    os.environ["PEERBENCH_DB_DIR"] = db_dir
    import run_one

    if app_name == "django":
        subprocess.run([sys.executable, "-m", "djangoshop", db_dir], cwd=HERE, check=True)
    setup = (run_one.DJANGO_SETUP if app_name == "django" else run_one.SETUP)[agent]
    sink, port = run_one.start_sink()
    try:
        app, shutdown, version, _ = setup("http://127.0.0.1:%d" % port, port)
        client = run_one.test_client(app)

        def get() -> None:
            r = client.get("/items")
            r.close()
            assert r.status_code == 200, r.status_code

        for _ in range(500):
            get()
        gc.collect()
        runs = {0: [0, 0], 1: [0, 0], 2: [0, 0]}
        began = {}
        thread_ns = time.thread_time_ns
        main = threading.get_ident()

        def timed(phase: str, info: dict) -> None:
            if threading.get_ident() != main:
                return  # a collection on the agent's thread: not the request's
            g = info["generation"]
            if phase == "start":
                began[g] = thread_ns()
            else:
                runs[g][0] += 1
                runs[g][1] += thread_ns() - began.pop(g, thread_ns())

        gc.callbacks.append(timed)
        t0 = thread_ns()
        for _ in range(n):
            get()
        thread = thread_ns() - t0
        gc.callbacks.remove(timed)
        tracked = len(gc.get_objects())

        # What the middle generation holds when it is collected (after the timed run: the
        # census walks it): what survives that goes to the oldest.
        census: collections.Counter[str] = collections.Counter()
        censuses = [0]

        def count(phase: str, info: dict) -> None:
            if phase == "start" and info["generation"] == 1:
                censuses[0] += 1
                census.update(type(o).__qualname__ for o in gc.get_objects(1))

        gc.callbacks.append(count)
        for _ in range(min(n, 600)):
            get()
        gc.callbacks.remove(count)
        shutdown()
    finally:
        sink.terminate()
        sink.wait(10)
    return {"agent": agent, "app": app_name, "version": version, "n": n,
            "thread_us_per_req": thread / n / 1000,
            "gc": {str(g): {"per_1000": c * 1000 / n, "us_per_req": ns / n / 1000}
                   for g, (c, ns) in runs.items()},
            "tracked_after": tracked, "middle_collections": censuses[0],
            "middle_generation": {k: v / max(censuses[0], 1) for k, v in census.most_common(12)}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("agents", nargs="*", default=["none", "beatlib", "elasticapm", "sentry",
                                                  "ddtrace", "otel"])
    ap.add_argument("--app", choices=("flask", "django"), default="flask")
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--reps", type=int, default=2, help="runs per agent, alternating")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.agents[0], args.app, args.n)), flush=True)
        return
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    results: dict[str, list[dict]] = collections.defaultdict(list)
    for _ in range(args.reps):
        for agent in args.agents:
            out = subprocess.run([sys.executable, __file__, "--child", agent, "--app", args.app,
                                  "--n", str(args.n)], capture_output=True, text=True, env=env,
                                 cwd=HERE)
            if out.returncode:
                sys.stderr.write(out.stderr)
                raise SystemExit(f"{agent} failed")
            results[agent].append(json.loads(out.stdout.strip().splitlines()[-1]))
    if args.out:
        with open(args.out, "w") as f:
            for runs in results.values():
                for r in runs:
                    f.write(json.dumps(r) + "\n")
    med = statistics.median
    print(f"{args.app}: {args.n} x /items per run, {args.reps} runs per agent (medians)")
    print("| agent | gen0 / 1000 req | gen1 | full | GC CPU µs/req (gen0 + gen1 + full) | "
          "tracked objects | the middle generation at its collections, by type |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for agent, runs in results.items():
        g = {k: (med(r["gc"][k]["per_1000"] for r in runs),
                 med(r["gc"][k]["us_per_req"] for r in runs)) for k in ("0", "1", "2")}
        middle = runs[-1]["middle_generation"]
        print("| %s | %.0f | %.1f | %.2f | %.1f (%.1f + %.1f + %.1f) | %s | %s |" % (
            agent, g["0"][0], g["1"][0], g["2"][0], sum(v[1] for v in g.values()), g["0"][1],
            g["1"][1], g["2"][1], f"{med(r['tracked_after'] for r in runs):,.0f}",
            ", ".join("%s %.0f" % kv for kv in list(middle.items())[:8])))


if __name__ == "__main__":
    main()
