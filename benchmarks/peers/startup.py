#!/usr/bin/env python3
"""Startup cost of each agent: `import <agent>` + creating its client + instrumenting, each
time in a fresh Python process.

    python startup.py [--reps 30] [--out results/startup.jsonl] [AGENT ...]

What is counted, per agent (the setup is run_one.py's Flask one, without building the app):
  - agent     python -c "<agent snippet>": import the agent, create its client (or init),
              instrument (beatlib: `import beatlib; beatlib.Client(...); beatlib.instrument()`)
  - agent+app the same snippet followed by the app's own imports (flask, sqlalchemy.orm,
              jinja2, requests), so patching those libraries at import is counted too
and the two baselines: `pass` (the interpreter alone, with `import time`) and `app` (the
app's imports alone). For each process, from the parent: wall time from spawn to reaped,
and CPU (user + system of the child, all its threads, from wait4's rusage), so interpreter
start and exit (atexit handlers, thread joins) are in it; inside the child: the wall and CPU
of each phase (import / client / instrument / app imports) between perf_counter and
process_time readings. A second set of runs under `python -X importtime` gives the import
time the interpreter itself reports: the sum of the top-level cumulative figures, minus the
same sum of the `pass` run. All variants are run once uncounted (bytecode compiled, files
cached), then in turn, REPS times (rotating the order), and medians are reported: net agent = agent - pass, net agent+app = agent+app - app.
The agent's destination is a loopback port that refuses connections (nothing is sent).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
AGENTS = ("beatlib", "elasticapm", "sentry", "ddtrace", "otel")
APP_IMPORTS = "import flask, sqlalchemy.orm, jinja2, requests"

# Each snippet: (imports, client, instrument), run in that order with a reading between.
SNIPPETS = {
    "beatlib": (
        "import beatlib",
        "c = beatlib.Client(service_name='peerbench', server_url=URL, environment='bench')",
        "beatlib.instrument()",
    ),
    "elasticapm": (
        "import elasticapm",
        "c = elasticapm.Client(service_name='peerbench', server_url=URL, environment='bench', "
        "metrics_interval='0s', cloud_provider='none')",
        "elasticapm.instrument()",
    ),
    "sentry": (
        "import sentry_sdk",
        # init() creates the client and enables the default integrations (its instrumenting)
        "sentry_sdk.init(dsn='http://key@127.0.0.1:%d/1' % PORT, traces_sample_rate=1.0, "
        "environment='bench')",
        "pass",
    ),
    "ddtrace": (
        "import os; os.environ['DD_TRACE_AGENT_URL'] = URL; os.environ['DD_SERVICE'] = "
        "'peerbench'; import ddtrace",
        "from ddtrace.trace import tracer",  # the global tracer is the client
        "ddtrace.patch(flask=True, sqlalchemy=True, jinja2=True, requests=True)",
    ),
    "otel": (
        "from opentelemetry import trace; "
        "from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter; "
        "from opentelemetry.sdk.resources import Resource; "
        "from opentelemetry.sdk.trace import TracerProvider; "
        "from opentelemetry.sdk.trace.export import BatchSpanProcessor; "
        "from opentelemetry.instrumentation.flask import FlaskInstrumentor; "
        "from opentelemetry.instrumentation.jinja2 import Jinja2Instrumentor; "
        "from opentelemetry.instrumentation.requests import RequestsInstrumentor; "
        "from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor",
        "p = TracerProvider(resource=Resource.create({'service.name': 'peerbench'})); "
        "p.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=URL + '/v1/traces'))); "
        "trace.set_tracer_provider(p)",
        "FlaskInstrumentor().instrument(); Jinja2Instrumentor().instrument(); "
        "RequestsInstrumentor().instrument(); SQLAlchemyInstrumentor().instrument()",
    ),
}

READ = "t.append((time.perf_counter_ns(), time.process_time_ns()))"


def code(agent: str | None, app: bool, port: int) -> str:
    lines = ["import time", "t = []", READ, "URL = 'http://127.0.0.1:%d'" % port,
             "PORT = %d" % port]
    for part in SNIPPETS[agent] if agent else ("pass", "pass", "pass"):
        lines += [part, READ]
    lines += [APP_IMPORTS if app else "pass", READ]
    lines.append("print('PHASES', *[(b[0] - a[0], b[1] - a[1]) for a, b in zip(t, t[1:])])")
    return "\n".join(lines)


def importtime_stderr(src: str) -> str:
    """The -X importtime report of one fresh process running src."""
    p = subprocess.run([sys.executable, "-X", "importtime", "-c", src], capture_output=True,
                       text=True)
    if p.returncode != 0:
        raise RuntimeError("child failed (rc %s): %s" % (p.returncode, p.stderr[-2000:]))
    return p.stderr


def run_timed(src: str) -> dict:
    """Wall and CPU (user + sys, all threads) of one fresh process, from wait4's rusage."""
    argv = [sys.executable, "-c", src]
    t0 = time.perf_counter_ns()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter_ns() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    p.stdout.close()
    if p.returncode != 0:
        raise RuntimeError("child failed (rc %s): %s" % (p.returncode, src[:200]))
    phases = []
    for line in out.decode().splitlines():
        if line.startswith("PHASES "):
            phases = [tuple(int(x) for x in part.strip("()").split(","))
                      for part in line[7:].split(") (")]
    return {"wall_ns": wall, "cpu_ns": int((ru.ru_utime + ru.ru_stime) * 1e9),
            "maxrss_kb": ru.ru_maxrss, "phases": phases}


def importtime_us(stderr: str) -> int:
    """Sum of the cumulative µs of the top-level imports in an -X importtime report (lines
    `import time: self | cumulative | name`, nested imports indented by two spaces more)."""
    total = 0
    for line in stderr.splitlines():
        if line.startswith("import time:") and "cumulative" not in line:
            _, cum, name = line.split("|")
            if not name.startswith("  "):
                total += int(cum)
    return total


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("agents", nargs="*")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default=None, help="append one JSON line (all figures) here")
    # Bytecode for every agent, as an installed package has it: with this set (some
    # sandboxes set it), the uncounted first run writes none for a source tree (beatlib on
    # PYTHONPATH, or installed editable), and each counted run would compile it again.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    a = ap.parse_args()
    agents = a.agents or list(AGENTS)
    port = closed_port()
    variants = [("pass", None, False), ("app", None, True)]
    for ag in agents:
        variants += [(ag, ag, False), (ag + "+app", ag, True)]
    raw: dict[str, list[dict]] = {v[0]: [] for v in variants}
    imp: dict[str, list[int]] = {v[0]: [] for v in variants}
    load0 = os.getloadavg()
    t_start = time.time()
    for _, agent, app in variants:  # not counted: compiles what has no .pyc yet, warms the page cache
        run_timed(code(agent, app, port))
    for rep in range(a.reps):
        k = rep % len(variants)
        for name, agent, app in variants[k:] + variants[:k]:
            src = code(agent, app, port)
            raw[name].append(run_timed(src))
            imp[name].append(importtime_us(importtime_stderr(src)))
        print("rep %d/%d done" % (rep + 1, a.reps), file=sys.stderr, flush=True)

    med = statistics.median
    fig = {}
    for name, _, _ in variants:
        rs = raw[name]
        phases = list(zip(*[r["phases"] for r in rs], strict=True))
        fig[name] = {
            "wall_ms": med(r["wall_ns"] for r in rs) / 1e6,
            "cpu_ms": med(r["cpu_ns"] for r in rs) / 1e6,
            "maxrss_kb": med(r["maxrss_kb"] for r in rs),
            "importtime_ms": med(imp[name]) / 1e3,
            # in-process phases: import, client, instrument, app imports (wall ms, cpu ms)
            "phases_ms": [(med(p[0] for p in ph) / 1e6, med(p[1] for p in ph) / 1e6)
                          for ph in phases],
        }
    net = {}
    for ag in agents:
        for suffix, base in (("", "pass"), ("+app", "app")):
            f, b = fig[ag + suffix], fig[base]
            net[ag + suffix] = {
                "wall_ms": f["wall_ms"] - b["wall_ms"], "cpu_ms": f["cpu_ms"] - b["cpu_ms"],
                "importtime_ms": f["importtime_ms"] - b["importtime_ms"],
                "maxrss_kb": f["maxrss_kb"] - b["maxrss_kb"],
                "import_ms": f["phases_ms"][0][0], "client_ms": f["phases_ms"][1][0],
                "instrument_ms": f["phases_ms"][2][0],
                "app_imports_ms": f["phases_ms"][3][0] - b["phases_ms"][3][0],
            }
    rec = {"kind": "startup", "reps": a.reps, "python": sys.version.split()[0],
           "figures": fig, "net": net, "loadavg_start": [round(x, 2) for x in load0],
           "elapsed_s": round(time.time() - t_start, 1)}
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(rec) + "\n")
    print(table(rec))


def table(rec: dict) -> str:
    fig, net = rec["figures"], rec["net"]
    out = ["### Startup: a fresh process each time, %d reps, medians (ms)\n" % rec["reps"],
           "baselines: `pass` %.1f wall / %.1f CPU; `app` imports %.1f wall / %.1f CPU; "
           "importtime of the app's imports %.1f\n" % (
               fig["pass"]["wall_ms"], fig["pass"]["cpu_ms"], fig["app"]["wall_ms"],
               fig["app"]["cpu_ms"], fig["app"]["importtime_ms"] - fig["pass"]["importtime_ms"]),
           "| agent | process wall − pass | process CPU − pass | importtime − pass "
           "| in-process: import / client / instrument | with app: wall − app | CPU − app "
           "| importtime − app | max RSS − pass (MB) |",
           "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for name in net:
        if name.endswith("+app"):
            continue
        n, w = net[name], net[name + "+app"]
        out.append("| %s | %.1f | %.1f | %.1f | %.1f / %.1f / %.1f | %.1f | %.1f | %.1f | %.1f |" % (
            name, n["wall_ms"], n["cpu_ms"], n["importtime_ms"], n["import_ms"], n["client_ms"],
            n["instrument_ms"], w["wall_ms"], w["cpu_ms"], w["importtime_ms"],
            n["maxrss_kb"] / 1024))
    return "\n".join(out)


if __name__ == "__main__":
    main()
