#!/usr/bin/env python3
"""The tables of bimodal.sh's JSON lines: per run (where the CPU went) and per round (ratios)."""
from __future__ import annotations

import json
import statistics
import sys


def main(path: str) -> None:
    runs = [json.loads(line) for line in open(path) if line.strip()]
    ok = [r for r in runs if not r.get("failed")]
    print("| round | agent | load1 | median µs | p99 µs | CPU µs/req | main run ms"
          " | main rq-wait ms | main blocked ms | main vol/invol cs | worker CPU ms"
          " | worker rq-wait ms | drains"
          " (max CPU ms) | sent in window | worker R: on main's core | main on core 0/1"
          " | sink CPU ms | foreign CPU ms | steal ms | calib ms before/after |")
    print("|" + "---|" * 20)
    for r in ok:
        p = r["probe"]
        ro = p["roles"]
        m, w = ro["main"], ro.get("worker")
        s = p.get("samples") or {}
        d = p.get("drains")
        oc = s.get("main_on_cpu", {})
        print("| %d | %s | %.2f | %.0f | %.0f | %.0f | %.0f | %.0f | %.0f | %d/%d | %s | %s | %s"
              " | %s | %s | %s/%s | %.0f | %.0f | %.0f | %s |" % (
                  r["round"], r["agent"], r["loadavg_start"][0], r["items"]["median_us"],
                  r["items"]["p99_us"], r["items"]["cpu_us_per_req"], m["run_ns"], m["rq_wait_ns"],
                  p["main_blocked_ms"], m["vol"], m["invol"],
                  "%.0f" % w["run_ns"] if w else "-", "%.0f" % w["rq_wait_ns"] if w else "-",
                  "%d (%.0f)" % (d["calls"], d["cpu_ms_max"]) if d else "-",
                  p.get("sent_requests_in_window", "-"),
                  "%d/%d" % (s["worker_R_same_cpu"], s["worker_R"]) if w and s else "-",
                  oc.get("0", 0), oc.get("1", 0), p["sink_cpu_ms"], p["foreign_cpu_ms"],
                  p["steal_ms"], "/".join("%.0f" % c for c in p.get("calib_ms", [])) or "-"))
    print()
    print("| round | median ratio | p99 ratio | CPU/req ratio | main rq-wait ms none→beatlib"
          " | main invol cs none→beatlib | worker CPU ms | worker R on main's core |")
    print("|---|---:|---:|---:|---|---|---:|---|")
    ratios = []
    for rnd in sorted({r["round"] for r in ok}):
        by = {r["agent"]: r for r in ok if r["round"] == rnd}
        if "none" not in by or "beatlib" not in by:
            continue
        n, b = by["none"], by["beatlib"]
        med = b["items"]["median_us"] / n["items"]["median_us"]
        ratios.append(med)
        pb, pn = b["probe"], n["probe"]
        s = pb.get("samples") or {}
        print("| %d | %.3fx | %.2fx | %.3fx | %.0f→%.0f | %d→%d | %.0f | %s |" % (
            rnd, med, b["items"]["p99_us"] / n["items"]["p99_us"],
            b["items"]["cpu_us_per_req"] / n["items"]["cpu_us_per_req"],
            pn["roles"]["main"]["rq_wait_ns"], pb["roles"]["main"]["rq_wait_ns"],
            pn["roles"]["main"]["invol"], pb["roles"]["main"]["invol"],
            pb["roles"]["worker"]["run_ns"],
            "%d/%d" % (s.get("worker_R_same_cpu", 0), s.get("worker_R", 0))))
    if ratios:
        print("\nmedian ratio over rounds %.3fx, range %.3f-%.3fx" % (
            statistics.median(ratios), min(ratios), max(ratios)))


if __name__ == "__main__":
    main(sys.argv[1])
