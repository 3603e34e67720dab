#!/usr/bin/env python3
"""Summarize run_one.py JSON lines (from run_all.sh) into markdown tables.

    python summarize.py results/run_all_XXXX.jsonl
"""
from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict

ORDER = ["none", "beatlib", "elasticapm", "sentry", "ddtrace", "otel"]


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, nd=0):
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return ("{:,.%df}" % nd).format(x)


def shipped(rec):
    """(transactions shipped, spans shipped) as decoded by the sink."""
    d = rec.get("sink", {}).get("decoded", {})
    if "elastic" in d:
        e = d["elastic"]
        return e.get("transaction", 0), e.get("span", 0), e.get("error", 0), e.get("span.composite_members", 0)
    if "sentry" in d:
        s = d["sentry"]
        return s.get("item.transaction", 0), s.get("spans", 0), s.get("item.event", 0), 0
    if "datadog" in d:
        x = d["datadog"]
        return x.get("root_spans", x.get("traces", 0)), x.get("spans", 0) - x.get("root_spans", 0), 0, 0
    if "otlp" in d:
        x = d["otlp"]
        return x.get("root_spans", 0), x.get("spans", 0) - x.get("root_spans", 0), 0, 0
    return 0, 0, 0, 0


def main(path):
    recs = [json.loads(l) for l in open(path) if l.strip().startswith("{")]
    failed = [r for r in recs if r.get("failed")]
    recs = [r for r in recs if not r.get("failed")]
    by_round = defaultdict(dict)
    by_agent = defaultdict(list)
    for r in recs:
        by_round[r["round"]][r["agent"]] = r
        by_agent[r["agent"]].append(r)
    agents = [a for a in ORDER if a in by_agent] + sorted(a for a in by_agent if a not in ORDER)

    # per-round overhead vs the 'none' run of the same round
    ovh = defaultdict(list)
    ratio = defaultdict(list)
    err_ovh = defaultdict(list)
    cpu_ovh = defaultdict(list)
    for rnd, runs in by_round.items():
        base = runs.get("none")
        if not base:
            continue
        for a, r in runs.items():
            ovh[a].append(r["items"]["median_us"] - base["items"]["median_us"])
            ratio[a].append(r["items"]["median_us"] / base["items"]["median_us"])
            err_ovh[a].append(r["error"]["median_us"] - base["error"]["median_us"])
            cpu_ovh[a].append(r["items"]["cpu_us_per_req"] - base["items"]["cpu_us_per_req"])

    n = recs[0]["n"] if recs else 0
    rounds = sorted(by_round)
    out = []
    out.append(
        "### /items overhead (N=%d per run, %d round(s), values = median across rounds)\n" % (n, len(rounds))
    )
    out.append(
        "| agent | version | /items median µs | /items p90 µs | overhead µs vs none | ratio vs none "
        "| CPU µs/req (all threads) | CPU overhead µs | /error median µs | /error overhead µs "
        "| /outbound median µs | sink requests | sink bytes |"
    )
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for a in agents:
        rs = by_agent[a]
        out.append(
            "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |"
            % (
                a,
                rs[0].get("version", "-"),
                fmt(med(r["items"]["median_us"] for r in rs)),
                fmt(med(r["items"]["p90_us"] for r in rs)),
                fmt(med(ovh[a]), 0) if a != "none" else "0",
                fmt(med(ratio[a]), 2) + "x" if a != "none" else "1.00x",
                fmt(med(r["items"]["cpu_us_per_req"] for r in rs)),
                fmt(med(cpu_ovh[a]), 0) if a != "none" else "0",
                fmt(med(r["error"]["median_us"] for r in rs)),
                fmt(med(err_ovh[a]), 0) if a != "none" else "0",
                fmt(med((r.get("outbound") or {}).get("median_us") for r in rs)),
                fmt(med(r["sink_requests"] for r in rs)),
                fmt(med(r["sink_bytes"] for r in rs)),
            )
        )

    out.append("\n### What reached the sink (median across rounds; expected = requests made incl. warm-up)\n")
    out.append(
        "| agent | transactions expected | transactions shipped | shipped % | child spans shipped "
        "| child spans / txn | errors shipped | flush+shutdown s | notes |"
    )
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for a in agents:
        if a == "none":
            continue
        rs = by_agent[a]
        sh = [shipped(r) for r in rs]
        exp = med(r["expected_transactions"] for r in rs)
        tx = med(s[0] for s in sh)
        sp = med(s[1] for s in sh)
        er = med(s[2] for s in sh)
        note = ""
        dec = rs[-1].get("sink", {}).get("decoded", {})
        if "sentry" in dec and dec["sentry"].get("discarded"):
            note = "client_report discarded: " + ", ".join(
                "%s=%s" % kv for kv in sorted(dec["sentry"]["discarded"].items())
            )
        if "elastic" in dec and dec["elastic"].get("span.composite_members"):
            comp = sum(v for k, v in dec["elastic"].get("span_names", {}).items() if " x" in k)
            note = "span compression: %d composite spans stand for %d DB queries (last round)" % (
                comp,
                dec["elastic"]["span.composite_members"],
            )
        out.append(
            "| %s | %s | %s | %s | %s | %s | %s | %s | %s |"
            % (
                a,
                fmt(exp),
                fmt(tx),
                fmt(100.0 * tx / exp if exp else None, 1),
                fmt(sp),
                fmt(sp / tx if tx else None, 1),
                fmt(er),
                fmt(med(r["flush_s"] for r in rs), 2),
                note,
            )
        )

    out.append("\n### Noise: /items median µs per round (min / max across rounds)\n")
    out.append("| agent | " + " | ".join("round %s" % r for r in rounds) + " | min | max | spread % | overhead min..max µs |")
    out.append("|---|" + "---:|" * len(rounds) + "---:|---:|---:|---|")
    for a in agents:
        vals = [by_round[r].get(a, {}).get("items", {}).get("median_us") for r in rounds]
        v = [x for x in vals if x is not None]
        o = ovh.get(a, [])
        out.append(
            "| %s | %s | %s | %s | %s | %s |"
            % (
                a,
                " | ".join(fmt(x) for x in vals),
                fmt(min(v)) if v else "-",
                fmt(max(v)) if v else "-",
                fmt(100.0 * (max(v) - min(v)) / min(v), 1) if v else "-",
                ("%s..%s" % (fmt(min(o)), fmt(max(o)))) if (o and a != "none") else "-",
            )
        )
    loads = [r.get("loadavg_start", [None])[0] for r in recs]
    loads = [x for x in loads if x is not None]
    if loads:
        out.append("\n1-min load average at run start: min %.2f, max %.2f" % (min(loads), max(loads)))
    if failed:
        out.append("\nFAILED runs: " + ", ".join("%s/round %s" % (f["agent"], f["round"]) for f in failed))
    print("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1])
