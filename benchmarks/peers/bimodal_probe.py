#!/usr/bin/env python3
"""run_one.py with a probe around its timed /items loop: where the CPU went, per thread.

    python bimodal_probe.py AGENT N --round R      # same arguments as run_one.py

Prints run_one's JSON line with a "probe" key added: for the /items window only, per thread
(main = the request thread, which is also the load generator, the Flask test client; the
beatlib worker; the rest) CPU, run-queue wait, context switches, migrations and the cores it
was seen on (a 20 ms sampler in a separate process); the sink's CPU; the machine's CPU used
by other processes and steal; and, for beatlib, each worker _drain/_seal call in the window
(wall and thread CPU: how long the worker held, or wanted, the GIL per batch).
PROBE_PIN=same|split pins the request thread to core 0 and the worker to core 0|1 first.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run_one as ro  # noqa: E402

TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
SAMPLER = r"""
import os, sys, time, json, signal
pid = sys.argv[1]; seen = []; stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
base = "/proc/%s/task/" % pid
while not stop:
    t = time.monotonic_ns()
    for tid in os.listdir(base):
        try:
            f = open(base + tid + "/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        seen.append((t, int(tid), f[0], int(f[36])))
    time.sleep(0.02)
print(json.dumps(seen))
"""
state: dict = {"drains": [], "seals": [], "sink_pid": None}


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def task(tid):
    base = "/proc/self/task/%d/" % tid
    stat, sched, status = _read(base + "stat"), _read(base + "schedstat"), _read(base + "status")
    if stat is None or sched is None or status is None:
        return None
    f = stat.rsplit(")", 1)[1].split()  # f[0] is field 3 (state)
    run_ns, wait_ns, slices = (int(x) for x in sched.split())
    st = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    mig = 0
    for line in (_read(base + "sched") or "").splitlines():
        if line.startswith("se.nr_migrations"):
            mig = int(line.split(":")[1])
    return {"ticks_ns": (int(f[11]) + int(f[12])) * TICK_NS, "run_ns": run_ns,
            "rq_wait_ns": wait_ns, "slices": slices, "vol": int(st["voluntary_ctxt_switches"]),
            "invol": int(st["nonvoluntary_ctxt_switches"]), "migrations": mig, "cpu": int(f[36])}


def proc_ticks(pid):
    s = _read("/proc/%d/stat" % pid)
    if s is None:
        return 0
    f = s.rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) * TICK_NS


def system():
    """Per core: busy (all but idle+iowait) and steal, in ns."""
    out = {}
    for line in (_read("/proc/stat") or "").splitlines():
        if line.startswith("cpu") and line[3].isdigit():
            v = [int(x) * TICK_NS for x in line.split()[1:]]
            out[line.split()[0]] = {"busy": sum(v[:8]) - v[3] - v[4], "steal": v[7]}
    return out


def snapshot():
    names = {t.native_id: t.name for t in threading.enumerate()}
    tasks = {}
    for tid in map(int, os.listdir("/proc/self/task")):
        info = task(tid)
        if info is not None:
            info["name"] = names.get(tid, "?")
            tasks[tid] = info
    return {"t": time.perf_counter_ns(), "proc_cpu_ns": time.process_time_ns(),
            "sink_ns": proc_ticks(state["sink_pid"]) if state["sink_pid"] else 0,
            "system": system(), "tasks": tasks, "transport": transport_stats()}


def transport_stats():
    try:
        from beatlib.transport import worker
    except ImportError:
        return None
    for t in list(worker._transports):
        return t.stats()
    return None


def role(name):
    if name == "MainThread":
        return "main"
    if name == "beatlib-transport":
        return "worker"
    return "other"


def diff(a, b, samples):
    wall = b["t"] - a["t"]
    roles: dict = {}
    for tid, tb in b["tasks"].items():
        ta = a["tasks"].get(tid)
        r = role(tb["name"])
        acc = roles.setdefault(r, {k: 0 for k in ("run_ns", "rq_wait_ns", "vol", "invol",
                                                   "migrations", "threads")})
        for k in ("run_ns", "rq_wait_ns", "vol", "invol", "migrations"):
            acc[k] += tb[k] - (ta[k] if ta else 0)
        acc["threads"] += 1
    proc = b["proc_cpu_ns"] - a["proc_cpu_ns"]
    live = sum(r["run_ns"] for r in roles.values())
    roles.setdefault("other", {"run_ns": 0, "threads": 0})
    roles["other"]["run_ns"] += max(0, proc - live)  # threads that ended in the window
    sys_busy = sum(b["system"][c]["busy"] - a["system"][c]["busy"] for c in b["system"])
    steal = sum(b["system"][c]["steal"] - a["system"][c]["steal"] for c in b["system"])
    sink = b["sink_ns"] - a["sink_ns"]
    m = roles["main"]
    out = {
        "wall_ms": wall / 1e6, "proc_cpu_ms": proc / 1e6, "sink_cpu_ms": sink / 1e6,
        "foreign_cpu_ms": (sys_busy - proc - sink - steal) / 1e6, "steal_ms": steal / 1e6,
        # main thread: not running, not runnable = blocked (GIL wait, I/O, sleep)
        "main_blocked_ms": (wall - m["run_ns"] - m["rq_wait_ns"]) / 1e6,
        "roles": {r: {k: (v / 1e6 if k.endswith("_ns") else v) for k, v in d.items()}
                  for r, d in roles.items()},
    }
    ta, tb = a["transport"], b["transport"]
    if ta and tb:
        out["sent_requests_in_window"] = tb["sent_requests"] - ta["sent_requests"]
        out["encoded_in_window"] = tb["queued"] - ta["queued"]  # queued counts items taken
        out["yields_in_window"] = tb["backpressure_waits"] - ta["backpressure_waits"]
    lo, hi = a["t"], b["t"]
    drains = [d for d in state["drains"] if d[0] <= hi and d[0] + d[1] >= lo and d[3]]
    if drains:
        w = sorted(d[1] for d in drains)
        c = sorted(d[2] for d in drains)
        out["drains"] = {"calls": len(drains), "items": sum(d[3] for d in drains),
                         "wall_ms_sum": sum(w) / 1e6, "cpu_ms_sum": sum(c) / 1e6,
                         "cpu_ms_median": c[len(c) // 2] / 1e6, "cpu_ms_max": c[-1] / 1e6,
                         "wall_ms_max": w[-1] / 1e6}
    seals = [s for s in state["seals"] if lo <= s[0] <= hi]
    out["seals_in_window"] = {"calls": len(seals), "cpu_ms_sum": sum(s[2] for s in seals) / 1e6}
    if samples is not None:
        names = {tid: role(t["name"]) for tid, t in b["tasks"].items()}
        by_t: dict = {}
        for t, tid, st, cpu in samples:
            by_t.setdefault(t, {})[names.get(tid, "other")] = (st, cpu)
        n = len(by_t)
        both_r = same_cpu = main_r = worker_r = worker_r_same = 0
        main_cpu: dict = {}
        for snap in by_t.values():
            mm, ww = snap.get("main"), snap.get("worker")
            if mm:
                main_cpu[mm[1]] = main_cpu.get(mm[1], 0) + 1
                main_r += mm[0] == "R"
            if mm and ww:
                same_cpu += mm[1] == ww[1]
                both_r += mm[0] == "R" and ww[0] == "R"
                worker_r += ww[0] == "R"
                worker_r_same += ww[0] == "R" and mm[1] == ww[1]
        out["samples"] = {"n": n, "main_R": main_r, "main_on_cpu": main_cpu,
                          "main_worker_same_cpu": same_cpu, "main_worker_both_R": both_r,
                          "worker_R": worker_r, "worker_R_same_cpu": worker_r_same}
    return out


def instrument_worker():
    try:
        from beatlib.transport.worker import Transport
    except ImportError:
        return
    drain, seal = Transport._drain, Transport._seal
    pc, tt = time.perf_counter_ns, time.thread_time_ns

    def _drain(self, limit=1000):
        n0, w0, c0 = len(self._queue), pc(), tt()
        drain(self, limit)
        state["drains"].append((w0, pc() - w0, tt() - c0, n0 - len(self._queue)))

    def _seal(self):
        w0, c0 = pc(), tt()
        seal(self)
        state["seals"].append((w0, pc() - w0, tt() - c0))

    Transport._drain, Transport._seal = _drain, _seal


def calibrate():
    """Thread CPU ms of a fixed pure-Python loop: how fast this core is right now."""
    c0 = time.thread_time_ns()
    d: dict = {}
    for i in range(300_000):
        d[i & 1023] = str(i)
    return (time.thread_time_ns() - c0) / 1e6


def pin(mode):
    """PROBE_PIN=same: request thread and worker on core 0; split: worker on core 1."""
    if not mode:
        return
    state["pin"] = mode
    for t in threading.enumerate():
        if t.name == "MainThread":
            os.sched_setaffinity(t.native_id, {0})
        elif t.name == "beatlib-transport":
            os.sched_setaffinity(t.native_id, {0} if mode == "same" else {1})


def main():
    start_sink, timed = ro.start_sink, ro.timed

    def start_sink_probed():
        p, port = start_sink()
        state["sink_pid"] = p.pid
        return p, port

    def timed_probed(client, path, n, expect):
        if path != "/items":
            return timed(client, path, n, expect)
        pin(os.environ.get("PROBE_PIN", ""))
        sampler = subprocess.Popen([sys.executable, "-c", SAMPLER, str(os.getpid())],
                                   stdout=subprocess.PIPE, text=True)
        time.sleep(0.1)
        calib0 = calibrate()
        a = snapshot()
        res = timed(client, path, n, expect)
        b = snapshot()
        calib1 = calibrate()
        sampler.send_signal(signal.SIGTERM)
        samples = json.loads(sampler.communicate(timeout=10)[0] or "null")
        state["probe"] = diff(a, b, samples)
        state["probe"]["calib_ms"] = [round(calib0, 1), round(calib1, 1)]
        return res

    ro.start_sink, ro.timed = start_sink_probed, timed_probed
    if sys.argv[1] == "beatlib":
        instrument_worker()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        ro.main()
    out = json.loads(buf.getvalue().strip().splitlines()[-1])
    out["probe"] = state.get("probe")
    out["pin"] = state.get("pin")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
